"""datagen: builds the data the search needs (synthetic worlds, safety and domain sets)."""
