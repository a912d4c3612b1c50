"""The fl/ FLoCoRA experiment as a Flower app, compressed by flocora_codec."""
