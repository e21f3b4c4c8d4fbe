"""Problems; importing this package registers every problem."""
