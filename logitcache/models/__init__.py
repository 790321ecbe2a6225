"""Model artifacts shared by the capture and train stages, with no stage logic: the embedded
SmolLM2 teacher (fetched and converted once, ``embedded``), weight hashing (``hashing``), the
per-user cache directory (``home``) and tokenizer fingerprints (``tokenizers``)."""
