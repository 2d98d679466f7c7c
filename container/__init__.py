"""Everything that runs inside the image: the training job, the server and what they share."""
