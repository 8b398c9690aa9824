"""The model set, the decoding strategies (plain, speculative, batched), explain, and the EFT facade."""
