"""Where model weights come from: the registry (tiny | production) and the tiny twins."""
