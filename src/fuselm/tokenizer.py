"""Text tokenizer: HF tokenizer.json through the `tokenizers` library, plus its chat template."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from .errors import FuselmError
from .formats.json_file import read_json_object


class Tokenizer:
    def __init__(self, backend: _HFTokenizer, *, bos_token: str | None = None, eos_token: str | None = None,
                 chat_template: str | None = None, add_bos: bool | None = None, source: str = "tokenizer"):
        self.backend = backend
        self.source = source
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_id = self.token_to_id(bos_token) if bos_token else None
        self.eos_id = self.token_to_id(eos_token) if eos_token else None
        self.chat_template = chat_template
        self.template_source = f"{source}: chat template"  # named in template errors
        # Whether encode() should prepend BOS when the backend's post-processor does not already do it.
        self.add_bos = add_bos

    @classmethod
    def from_file(cls, path: Path, config_path: Path | None = None) -> Tokenizer:
        path = Path(path)
        try:
            backend = _HFTokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception on bad files
            raise FuselmError(f"{path}: cannot read tokenizer ({err})") from None
        cfg: dict = {}
        if config_path is not None and Path(config_path).is_file():
            cfg = read_json_object(config_path)
        where = str(config_path)

        def token_str(key: str) -> str | None:
            value = cfg.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if value is not None and not isinstance(value, str):
                raise FuselmError(f"{where}: key {key!r} is {value!r}; expected a token string")
            return value

        template = cfg.get("chat_template")
        if isinstance(template, list):  # HF allows named templates; take "default"
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if template is not None and not isinstance(template, str):
            raise FuselmError(f"{where}: key 'chat_template' must be a string (or a list of named templates)")
        add_bos = cfg.get("add_bos_token")
        if add_bos is not None and not isinstance(add_bos, bool):
            raise FuselmError(f"{where}: key 'add_bos_token' is {add_bos!r}; expected true or false")
        specials = {key: token_str(key) for key in ("bos_token", "eos_token")}
        for key, token in specials.items():
            if token and backend.token_to_id(token) is None:
                raise FuselmError(f"{where}: key {key!r} is {token[:80]!r}, which is not a token of {path}")
        tok = cls(backend, bos_token=specials["bos_token"], eos_token=specials["eos_token"],
                  chat_template=template, add_bos=add_bos, source=str(path))
        tok.template_source = f"{where}: chat_template" if template is not None else tok.template_source
        return tok

    @classmethod
    def from_dir(cls, directory: Path) -> Tokenizer | None:
        directory = Path(directory)
        if not (directory / "tokenizer.json").is_file():
            return None
        return cls.from_file(directory / "tokenizer.json", directory / "tokenizer_config.json")

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def token_to_id(self, token: str) -> int:
        i = self.backend.token_to_id(token)
        if i is None:
            raise FuselmError(f"{self.source}: token {token!r} is not in the vocabulary")
        return i

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(i)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
