"""Model store, registry client, download, verification and repair for llmnode."""
