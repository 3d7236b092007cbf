"""The HTTP front-end: the article's upload API, KServe V2 and TF Serving REST on one port."""
