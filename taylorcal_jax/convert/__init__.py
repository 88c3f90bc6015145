"""Teacher -> student parameter conversions."""
