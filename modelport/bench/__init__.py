"""``modelport bench``: an honest load generator for modelport and the servers it is compared with.

``protocols`` builds and reads one request per protocol, ``run`` holds the open and closed loops
(latency from the planned send time), ``report`` summarises and plots, ``sweep`` runs the levels
asked for and reads the server's own figures around them.
"""
