"""Models, data and registry for the CIFAR pipeline: plain Python and Keras, no Prefect."""
