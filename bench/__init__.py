"""Benchmarks for syncd (issue 6): each one times syncd and a peer against fresh reference servers in the
same run, verifies the outcome on the server before printing a figure, and never asserts a timing.

Run ``python -m bench`` (or ``make bench``); ``python -m bench --help`` lists the options.
"""
