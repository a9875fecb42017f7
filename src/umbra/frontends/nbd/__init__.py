"""The NBD front end: wire protocol and asyncio server."""
