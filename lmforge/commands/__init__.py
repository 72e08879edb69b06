"""One module per `lmforge` verb: each has register(subparsers) and a handler `run(args)`."""
