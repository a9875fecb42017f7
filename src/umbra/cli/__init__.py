"""The command line: a thin shell over the library.  Nothing else imports this package."""
