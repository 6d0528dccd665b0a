"""The coordinator: the grid, the rounds, aggregation and secure-aggregation stages."""
