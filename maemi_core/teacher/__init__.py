"""Teachers that write instruction data, their cache, prompt packs and the instruction set."""
