"""The served models: the name -> backend registry and the models file it is read from."""
