"""What the node does with what arrives: C-STORE (``c_store``) and the association's
lifecycle (``association``); C-ECHO is answered by ``dicom_node.ae.association`` itself."""
