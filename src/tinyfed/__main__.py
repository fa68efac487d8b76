from tinyfed.cli import entry

entry()
