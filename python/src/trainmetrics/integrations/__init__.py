"""Integrations with training frameworks, each importing its framework only when used:
`transformers` (HF Trainer callback), `lightning` (a Lightning logger), `axolotl` (an Axolotl
plugin that adds the HF callback)."""
