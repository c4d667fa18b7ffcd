"""The PEFT contract: config, layers, save/load, merge, export, quantized bases, PEFT's own generic tests, import
rules."""
