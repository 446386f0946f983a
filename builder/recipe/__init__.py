"""The recipe: schema (pydantic), YAML with file:line, model references, project settings."""
