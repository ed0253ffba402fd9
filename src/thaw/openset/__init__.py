"""The open world: saying "none of these" for an image of no known class (scores, and fitting
the rule after training), and adding classes to a trained model's head."""
