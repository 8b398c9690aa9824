"""What each model sees: chat templates rendered within limits, raw text, plain transcripts."""
