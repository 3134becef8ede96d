"""The part a person touches: kernel registration, the daemon, configuration and ``hbactl``."""
