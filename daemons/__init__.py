"""The daemon runtime (worker loop, engine interface) and the engines modelhost ships.

Everything a daemon process imports runs on Python 3.7 with only pyzmq and
msgpack; it never imports the broker.
"""
