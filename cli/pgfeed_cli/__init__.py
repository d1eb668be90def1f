"""The pgfeed command-line front end (click). The library never imports it."""
