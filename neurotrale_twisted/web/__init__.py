"""The web layer: the Klein app and the site that turn HTTP requests into calls of the core
and the core's answers and errors into responses. Imports the core, never ``process``."""
