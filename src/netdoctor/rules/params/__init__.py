"""ND2xx: parameters and the signal at initialization (`GraphContext.graph`, whose weight layers
carry their parameter statistics and the signal RMS measured on a unit-variance batch)."""
