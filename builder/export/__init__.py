"""Helpers the export stages run in a subprocess (llama.cpp's converter) or share."""
