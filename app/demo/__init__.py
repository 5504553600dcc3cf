"""The built-in demo: an app with every kind of request, and traffic to drive it."""
