"""ND1xx: problems visible in the model's graph (`GraphContext.graph`): its structure, what its
output is made of, where the gradient is cut."""
