// Runs PixelMed's DicomSRValidator on several SR files in one Java process (its constructor compiles the template
// stylesheets, several seconds, once instead of once per file). For each file it prints a line
// "=== FILE <path>" and then exactly what `java com.pixelmed.validate.DicomSRValidator <path>` prints for it.
//
// Usage (Java 11+ source-file mode, needs the JDK's compiler module):
//   java -cp /usr/share/java/pixelmed.jar ValidateSRs.java FILE...
import com.pixelmed.validate.DicomSRValidator;

public class ValidateSRs {
    public static void main(String[] args) throws Exception {
        DicomSRValidator validator = new DicomSRValidator();
        int failed = 0;
        for (String path : args) {
            System.out.println("=== FILE " + path);
            try {
                System.out.print(validator.validate(path));
            } catch (Exception e) {
                failed++;
                System.out.println("Error: validation did not complete: " + e);
            }
            System.out.flush();
        }
        System.exit(failed == 0 ? 0 : 1);
    }
}
