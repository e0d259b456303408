"""Hand-written mini XSDs, just enough for xnatpy to build its object model (contract rows M1-M3).

Only needed when a client connects without ``no_parse_model``: xnatpy then fetches
``/xapi/schemas/xnat`` and ``/xapi/schemas/xdat`` and generates classes from them. The types here
are the ones xnatpy needs for projects, their resources and files: projectData, the experiment
extension chain, imageScanData and the abstractResource -> resource -> resourceCatalog chain.
"""

from __future__ import annotations

#: The ``resources`` child that projects, subjects and experiments share in XNAT's schema.
_RESOURCES = """      <xs:element name="resources" minOccurs="0">
        <xs:complexType>
          <xs:sequence>
            <xs:element name="resource" type="xnat:abstractResource" minOccurs="0" maxOccurs="unbounded"/>
          </xs:sequence>
        </xs:complexType>
      </xs:element>
"""

XNAT_XSD = """<?xml version="1.0" encoding="UTF-8"?>
<xs:schema targetNamespace="http://nrg.wustl.edu/xnat" xmlns:xnat="http://nrg.wustl.edu/xnat" \
xmlns:xdat="http://nrg.wustl.edu/xdat" xmlns:xs="http://www.w3.org/2001/XMLSchema" \
elementFormDefault="qualified" attributeFormDefault="unqualified">
  <xs:element name="Project" type="xnat:projectData"/>
  <xs:element name="Subject" type="xnat:subjectData"/>
  <xs:element name="MRSession" type="xnat:mrSessionData"/>
  <xs:element name="Resource" type="xnat:resource"/>
  <xs:element name="ResourceCatalog" type="xnat:resourceCatalog"/>
  <xs:complexType name="abstractResource" abstract="true">
    <xs:sequence>
      <xs:element name="note" type="xs:string" minOccurs="0"/>
    </xs:sequence>
    <xs:attribute name="label" type="xs:string"/>
    <xs:attribute name="file_count" type="xs:integer"/>
    <xs:attribute name="file_size" type="xs:long"/>
  </xs:complexType>
  <xs:complexType name="resource">
    <xs:complexContent>
      <xs:extension base="xnat:abstractResource">
        <xs:attribute name="URI" type="xs:string" use="required"/>
        <xs:attribute name="format" type="xs:string"/>
        <xs:attribute name="description" type="xs:string"/>
        <xs:attribute name="content" type="xs:string"/>
      </xs:extension>
    </xs:complexContent>
  </xs:complexType>
  <xs:complexType name="resourceCatalog">
    <xs:complexContent>
      <xs:extension base="xnat:resource"/>
    </xs:complexContent>
  </xs:complexType>
  <xs:complexType name="projectData">
    <xs:sequence>
      <xs:element name="name" type="xs:string" minOccurs="0"/>
      <xs:element name="description" type="xs:string" minOccurs="0"/>
{RESOURCES}    </xs:sequence>
    <xs:attribute name="ID" type="xs:string" use="required"/>
    <xs:attribute name="secondary_ID" type="xs:string"/>
  </xs:complexType>
  <xs:complexType name="subjectData">
    <xs:sequence>
{RESOURCES}    </xs:sequence>
    <xs:attribute name="ID" type="xs:string"/>
    <xs:attribute name="project" type="xs:string"/>
    <xs:attribute name="label" type="xs:string"/>
  </xs:complexType>
  <xs:complexType name="experimentData" abstract="true">
    <xs:sequence>
      <xs:element name="date" type="xs:date" minOccurs="0"/>
{RESOURCES}    </xs:sequence>
    <xs:attribute name="ID" type="xs:string" use="required"/>
    <xs:attribute name="project" type="xs:string" use="required"/>
    <xs:attribute name="label" type="xs:string"/>
  </xs:complexType>
  <xs:complexType name="subjectAssessorData" abstract="true">
    <xs:complexContent>
      <xs:extension base="xnat:experimentData">
        <xs:sequence>
          <xs:element name="subject_ID" type="xs:string" minOccurs="0"/>
        </xs:sequence>
      </xs:extension>
    </xs:complexContent>
  </xs:complexType>
  <xs:complexType name="imageSessionData" abstract="true">
    <xs:complexContent>
      <xs:extension base="xnat:subjectAssessorData">
        <xs:sequence>
          <xs:element name="UID" type="xs:string" minOccurs="0"/>
          <xs:element name="scans" minOccurs="0">
            <xs:complexType>
              <xs:sequence>
                <xs:element name="scan" type="xnat:imageScanData" minOccurs="0" maxOccurs="unbounded"/>
              </xs:sequence>
            </xs:complexType>
          </xs:element>
        </xs:sequence>
        <xs:attribute name="modality" type="xs:string"/>
      </xs:extension>
    </xs:complexContent>
  </xs:complexType>
  <xs:complexType name="mrSessionData">
    <xs:complexContent>
      <xs:extension base="xnat:imageSessionData"/>
    </xs:complexContent>
  </xs:complexType>
  <xs:complexType name="imageScanData" abstract="true">
    <xs:sequence>
      <xs:element name="series_description" type="xs:string" minOccurs="0"/>
      <xs:element name="file" type="xnat:abstractResource" minOccurs="0" maxOccurs="unbounded"/>
    </xs:sequence>
    <xs:attribute name="ID" type="xs:string" use="required"/>
    <xs:attribute name="type" type="xs:string"/>
    <xs:attribute name="UID" type="xs:string"/>
  </xs:complexType>
</xs:schema>
""".replace("{RESOURCES}", _RESOURCES)

XDAT_XSD = """<?xml version="1.0" encoding="UTF-8"?>
<xs:schema targetNamespace="http://nrg.wustl.edu/xdat" xmlns:xdat="http://nrg.wustl.edu/xdat" \
xmlns:xs="http://www.w3.org/2001/XMLSchema" elementFormDefault="qualified" attributeFormDefault="unqualified">
  <xs:element name="user" type="xdat:user"/>
  <xs:complexType name="user">
    <xs:sequence>
      <xs:element name="login" type="xs:string"/>
      <xs:element name="email" type="xs:string" minOccurs="0"/>
    </xs:sequence>
  </xs:complexType>
</xs:schema>
"""

SCHEMAS: dict[str, str] = {"xnat": XNAT_XSD, "xdat": XDAT_XSD}

BUILD_INFO: dict[str, str] = {
    "version": "1.8.10",
    "buildNumber": "emulator",
    "buildDate": "2024-01-01T00:00:00Z",
    "commit": "0000000",
    "Implementation-Version": "1.8.10",
}
