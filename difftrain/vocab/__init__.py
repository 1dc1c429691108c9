"""Other programs' configuration vocabularies, each one table translated at the front door."""
