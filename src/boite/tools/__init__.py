"""Guest tools, host side: the protocol, the VMM's end of the channel, and clients.

The agent is guest/tools/boite-tools.c; the protocol is docs/tools-protocol.md.
"""

from boite.tools.client import ToolsClient
from boite.tools.host import ToolsHost, tools_socket_path
from boite.tools.protocol import PORT_NAME, PROTOCOL_VERSION

__all__ = ["PORT_NAME", "PROTOCOL_VERSION", "ToolsClient", "ToolsHost", "tools_socket_path"]
