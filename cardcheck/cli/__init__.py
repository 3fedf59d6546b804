"""The `cardcheck` command: run the mesh locally, walk through the user journey."""
