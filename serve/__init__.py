"""Everything about running TorchServe: configuration profiles, the archiver wrapper, a process
launcher and the one HTTP client used by the UI and the CLI. May import :mod:`deepminer`; the library
never imports this package."""
