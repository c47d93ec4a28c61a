"""The diffusers worker (HTTP -> queue -> batcher -> pipeline). Built in its own issue."""
