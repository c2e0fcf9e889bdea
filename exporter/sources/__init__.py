"""Where generation ids come from: a tailed log file or a UDP socket."""
