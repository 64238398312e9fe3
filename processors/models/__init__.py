"""Shipped demo models (``*.skops``) and the script that trains them."""
