from shiplane.launch import entry

entry()
