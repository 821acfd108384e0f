"""File formats: each module reads and writes one format and knows nothing about the model's math."""
