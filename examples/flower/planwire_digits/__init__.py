"""planwire_digits: a Flower app whose clients train a planwire training plan (no torch on clients)."""
