"""The `deit-distill` commands, built on the `training` library (which never imports them).

train, eval, predict, convert, card, push and demo: each module turns arguments into calls to the library and
prints or writes the result. `cli.main` is the entry point.
"""
