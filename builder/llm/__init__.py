"""Talking to models: served and in-process clients, llama.cpp scoring and generation, item cache."""
