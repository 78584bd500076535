"""speechgpt_min: a readable, from-scratch PyTorch implementation of SpeechGPT.

One module per concept, in the order speech flows through the system:
audio -> hubert -> units -> tokenizer -> model (+ lora, weights) -> data -> trainer -> vocoder -> pipeline.
"""
__version__ = "0.1.0"
