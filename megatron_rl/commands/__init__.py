"""One module per `megatron-rl` subcommand; each defines add_parser(subparsers) and sets `run` on its parser."""
