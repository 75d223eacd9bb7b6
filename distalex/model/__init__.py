"""The network: one spec owns every shape; the reference AlexNet (towers as grouped convolutions) and its FLOP count. Knows nothing of devices or processes."""
