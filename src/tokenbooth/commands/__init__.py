"""The `tokenbooth` subcommands, one module each: `add_parser(subparsers)` declares the flags and `run(args)`
turns them into typed settings and calls the library."""
