from shiplane.cli import entry

entry()
