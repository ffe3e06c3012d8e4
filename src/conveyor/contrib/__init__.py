"""Optional integrations with other libraries, each imported only when used.

``conveyor.contrib.streamz``: streamz sources and a sink (``pip install 'conveyor[streamz]'``).
"""
